"""`sdpo bench`: the evidence benchmarks (methods across data conditions, beta and seeds; step speed)."""
