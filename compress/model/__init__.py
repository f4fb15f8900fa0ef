"""The model: loading a Hugging Face checkpoint (local folder or hub id) and finding its targets."""
