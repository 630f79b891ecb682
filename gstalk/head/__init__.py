"""Parametric head models in FLAME format (official FLAME when the user has it, gstalk's
open stand-in otherwise), skinning, landmark embedding, and the monocular tracker."""
