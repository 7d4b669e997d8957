import subprocess, time
def test_probe(lazy_podman, e2e_images):
    image = e2e_images.app_esgz
    lazy_podman.pull(image)
    t=time.monotonic(); p = lazy_podman.podman("--log-level=debug", "run", "--net=none", "--pull=never", lazy_podman.ref(image)); print("run", time.monotonic()-t)
    open("/tmp/e2e-probe/podman-debug.log","w").write(p.stderr)
    import shutil; shutil.copy(lazy_podman.store.log_path, "/tmp/e2e-probe/store.log")
