"""midisc: sparse autoencoders on language-model activations, tracked in a database."""
