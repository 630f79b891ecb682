"""Driving an avatar: audio or a track in, frames and an mp4 with sound out (camera paths too)."""
