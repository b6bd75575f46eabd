"""Floor 3 of docs/layers.md: avel-predict and the whole-pipeline checks, the one layer that joins stage 1
(``extract``) and stage 2 (``train``), in-process."""
