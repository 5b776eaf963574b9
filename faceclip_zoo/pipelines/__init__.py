"""diffusers pipelines and components of faceclip_zoo."""
