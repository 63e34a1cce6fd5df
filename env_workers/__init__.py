"""Simulators behind one episode API, scripted experts, demonstrations."""
