"""The four Hub files (configuration_acip, modeling_acip, parametrization, pruning), installed as the package acip.hub.

This file exists so that an installed or editable acip can import them as a regular subpackage; a Hub repository
holds only the four files themselves.
"""
