"""ServiceAuthorization: plain domain types, their evaluation, and conversion from the CRD's JSON.

No Kubernetes imports here: CRD dicts are converted into frozen dataclasses at the edge (`crd.py`).
"""
