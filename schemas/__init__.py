"""The Avro contract for Flireo events: schemas, wire codec, normalisers, evolution rules."""
