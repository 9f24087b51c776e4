"""What a decoder replica loads: the base model (GGUF -> Hugging Face folder), checkpoints,
int4 weights, the SAT adapter and vocabulary, the MLP speculator, the tokenizer and the chat template."""
