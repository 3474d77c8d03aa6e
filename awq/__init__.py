"""The P3-LLM / llm-awq command-line front: `python -m awq.entry ...` from the repository root
(and scripts/awq/*.sh). The algorithm lives in `wkvaq_quant.weights.awq`; this folder is not
installed, so it never shadows llm-awq's or AutoAWQ's `awq` package."""
