"""Lazy-pulling Additional Layer Store for Podman and CRI-O."""
