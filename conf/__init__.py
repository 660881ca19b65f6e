"""Hydra configs of rcd (a package so that Hydra finds them inside an installed wheel)."""
