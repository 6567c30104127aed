"""A finding in the words a radiologist reads at a glance, the same everywhere it is shown:
the SR's Comment, the GSPS on the image, Orthanc Explorer, the status page.

Standard library only: Orthanc's process imports it (plugin/status_page.py).
"""

from __future__ import annotations


def finding_words(name: str, positive: bool, probability: float, volume_ml: float | None = None,
                  change: str | None = None) -> str:
    """"Fracture present, probability 0.63"; a measured volume adds ", volume 13.4 mL" and an
    interval change follows after "; " ("new since 2024-12-11")."""
    words = f"{name} {'present' if positive else 'absent'}, probability {probability:.2f}"
    if volume_ml is not None:
        words += f", volume {volume_ml:.1f} mL"
    return f"{words}; {change}" if change else words
