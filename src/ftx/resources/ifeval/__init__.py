"""IFEval, vendored: the 541 prompts (input_data.jsonl) and the instruction checkers of lm-evaluation-harness
(instructions*.py, Apache-2.0, The Google Research Authors). SOURCE.md says where each file comes from, its sha256
and what was changed; ftx.metrics.ifeval is the only user. A package (not plain data) so that the checkers import
as ftx.resources.ifeval.instructions_registry without lm_eval's package __init__ and its dependencies."""
