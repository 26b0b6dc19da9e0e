"""The test suite: it mirrors the tunelab package (tests/quant, tests/lora, ...); helpers in tests.support."""
