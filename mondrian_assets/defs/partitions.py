"""One partition per advisor that has linked records; `linked_records` adds new advisors as they appear."""

import dagster as dg

ADVISOR_PARTITIONS_NAME = "advisor"
advisor_partitions = dg.DynamicPartitionsDefinition(name=ADVISOR_PARTITIONS_NAME)
