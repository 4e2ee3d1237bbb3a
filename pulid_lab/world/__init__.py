"""ToyFaces: the procedural, seeded world of 32x32 portraits (identities, attributes, the closed vocabulary,
captions) and its cached banks of renders."""
