"""edgeft: fine-tune a Hugging Face causal LM with QAT and take it to a phone."""

__version__ = "0.1.0"
