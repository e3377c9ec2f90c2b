"""Build of the native extension; the package metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "jasper._native",
            sources=["native/pymodule.c", "native/receiver_core.c"],
            depends=["native/receiver_core.h", "native/jasper_mp.h", "ebpf/include/jasper_wire.h"],
            include_dirs=["native", "ebpf/include"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            libraries=["crypto"],  # OpenSSL libcrypto: HMAC-SHA256 of the datagram MAC
        ),
        Extension(
            "overlay._datapath",
            sources=["native/pump.c", "native/receiver_core.c"],
            depends=["native/receiver_core.h", "native/jasper_mp.h", "ebpf/include/jasper_wire.h"],
            include_dirs=["native", "ebpf/include"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
            libraries=["m", "crypto"],
        ),
        Extension(
            "overlay._releasequeue",
            sources=["native/release_queue.c"],
            depends=["native/jasper_mp.h"],
            include_dirs=["native"],
            extra_compile_args=["-O2", "-Wall", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ]
)
