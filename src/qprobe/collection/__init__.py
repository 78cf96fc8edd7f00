"""Collection: the pipeline that writes runs (sample, score, embed), above the store, which knows only
runs on disk. `collect` samples a task's prompts; `add_features` embeds a stored run again;
`embed_pairs` stores preference pairs as a run; `shots_from_run` draws few-shot examples from one."""
