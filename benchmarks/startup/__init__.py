"""Container start-time benchmark (issue 6): shaped link, locally built images, podman runs; see README.md."""
