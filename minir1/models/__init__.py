"""Model families: the DeepSeek-V3 architecture (`deepseek_v3.py`), the interface every family offers
(`base.py`), and their Hugging Face adapters (`hf/`)."""
