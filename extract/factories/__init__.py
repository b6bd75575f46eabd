"""Floor 1 of docs/layers.md: factories of demo clips, synthetic stores and video files. They write
through the contract (``extract.core``) only and import neither stage, so both stages' demo commands,
benchmarks and tests can use them."""
