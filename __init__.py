"""The three Hub files (configuration_acip, modeling_acip, parametrization), installed as the package acip.hub.

This file exists so that an installed or editable acip can import them as a regular subpackage; a Hub repository
holds only the three files themselves.
"""
