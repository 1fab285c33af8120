"""Where a model comes from: what the user typed after --model resolved to a path (resolve), models and data
downloaded from the Hugging Face Hub (download), and the default model fetched at install (fetch)."""
