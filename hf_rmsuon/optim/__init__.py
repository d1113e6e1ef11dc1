"""Optimizer classes, one per algorithm, over the shared functional core."""

from .adamuon import AdaMuon
from .base import FamilyOptimizer
from .muon import Muon, PureNSMuon
from .rmsuon import AdaRMSuon, FAdaRMSuon, RMSuon
from .sam import ARS, ARS2Neo

__all__ = ["ARS", "AdaMuon", "AdaRMSuon", "ARS2Neo", "FAdaRMSuon", "FamilyOptimizer", "Muon", "PureNSMuon", "RMSuon"]
