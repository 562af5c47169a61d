"""(being built: see the issue notes)"""
