"""Models of the reporting app (SPEC §2); its capability adds them."""
