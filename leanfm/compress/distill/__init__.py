"""Knowledge distillation: recover a compressed student from its uncompressed teacher."""
