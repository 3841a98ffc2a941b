from setuptools import setup

setup(
    name="odissey",
    version="0.1.0",
    description="A PostgreSQL connection pooler and request router on Twisted",
    python_requires=">=3.9",  # CPython 3.10+ and PyPy 3 (Python 3.9)
    packages=["odissey", "odissey.wire", "odissey.auth", "twisted.plugins"],
    install_requires=[
        "twisted>=23.8",
        "pyopenssl",
        "service-identity",
        "pyyaml",
        "scramp>=1.4",
        # The metrics endpoint's text format (pure Python: installs on PyPy 3.9 too).
        "prometheus_client>=0.17",
        # PyPy 3.9 (Debian's pypy3) has wheels up to these; newer ones would need Rust.
        "cryptography<44; platform_python_implementation == 'PyPy'",
        "pyopenssl<25; platform_python_implementation == 'PyPy'",
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            "psycopg[binary]>=3.1",
            "psycopg2-binary",
            "txpostgres",
            "asyncpg",
        ],
    },
)
