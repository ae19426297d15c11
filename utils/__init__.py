"""What several packages share: the SPR encoder/decoder, letterbox geometry, drawing."""
