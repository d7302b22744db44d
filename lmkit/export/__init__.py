"""Export trained runs: Hugging Face folders (verified against the native model) and plain safetensors."""
