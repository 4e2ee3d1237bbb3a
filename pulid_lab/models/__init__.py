"""The mini world's "foundation models": networks, the text encoder, the original text-to-image model, the face
recognizers and the conditioning path, and the one checkpoint format they are shipped in."""
