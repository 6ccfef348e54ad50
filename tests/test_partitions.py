import pytest

from pipelines.partitions import MAX_ITERATIONS, iteration_index, iteration_key, iteration_partitions


def test_keys_are_iteration_numbers_that_round_trip():
    keys = iteration_partitions.get_partition_keys()
    assert keys[:3] == ["001", "002", "003"] and len(keys) == MAX_ITERATIONS
    assert [iteration_index(k) for k in keys] == list(range(1, MAX_ITERATIONS + 1))
    assert all(iteration_key(iteration_index(k)) == k for k in keys)


@pytest.mark.parametrize("bad", ["000", "1", "abc", f"{MAX_ITERATIONS + 1:03d}", "2000-01-01"])
def test_bad_keys_are_rejected_with_the_key_in_the_message(bad):
    with pytest.raises(ValueError, match=bad):
        iteration_index(bad)


def test_previous_iteration_mapping_points_one_back():
    import dagster as dg

    from pipelines.partitions import PREVIOUS_ITERATION

    sub = iteration_partitions.empty_subset().with_partition_keys(["003"])
    up = PREVIOUS_ITERATION.get_upstream_mapped_partitions_result_for_partitions(
        sub, iteration_partitions, iteration_partitions)
    assert list(up.partitions_subset.get_partition_keys()) == ["002"]
    first = iteration_partitions.empty_subset().with_partition_keys(["001"])
    up1 = PREVIOUS_ITERATION.get_upstream_mapped_partitions_result_for_partitions(
        first, iteration_partitions, iteration_partitions)
    assert list(up1.partitions_subset.get_partition_keys()) == []
    assert isinstance(PREVIOUS_ITERATION, dg.TimeWindowPartitionMapping)
