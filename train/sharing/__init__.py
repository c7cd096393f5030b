"""A generator shared: its export and how it is read back (export), its model card (model_card), the Hugging Face
Hub (hub)."""
