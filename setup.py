"""Map the top-level folders registry/ and client/ into the deltareg namespace.

A computed package list (not a hand-written one) so that no subpackage is silently dropped from
the wheel. migrations/ ships inside the server package so `deltareg serve` can upgrade the
embedded database from an installed wheel too.
"""

from setuptools import find_packages, setup

ROOTS = ("registry", "client")

packages = [f"deltareg.{pkg}" for pkg in find_packages(include=[f"{root}*" for root in ROOTS])]
package_dir = {f"deltareg.{root}": root for root in ROOTS}
package_dir["deltareg.registry.migrations"] = "migrations"
packages += ["deltareg.registry.migrations", "deltareg.registry.migrations.versions"]
package_dir["deltareg.registry.migrations.versions"] = "migrations/versions"
# Folders of data files, listed as packages: setuptools warns that it will drop them otherwise.
packages += ["deltareg.registry.ui.templates", "deltareg.registry.ui.static"]

setup(
    package_dir=package_dir,
    packages=sorted(set(packages)),
    package_data={
        "deltareg.registry": ["py.typed"],
        "deltareg.client": ["py.typed"],
        "deltareg.registry.migrations": ["*.py", "*.mako"],
        "deltareg.registry.migrations.versions": ["*.py"],
        "deltareg.registry.ui.templates": ["*.html"],
        "deltareg.registry.ui.static": ["*.css"],
    },
)
