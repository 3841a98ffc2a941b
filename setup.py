from setuptools import setup

setup(
    name="odissey",
    version="0.1.0",
    description="A PostgreSQL connection pooler and request router on Twisted",
    python_requires=">=3.10",
    packages=["odissey", "odissey.wire", "odissey.auth", "twisted.plugins"],
    install_requires=[
        "twisted>=23.8",
        "pyopenssl",
        "service-identity",
        "pyyaml",
        "scramp>=1.4",
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
