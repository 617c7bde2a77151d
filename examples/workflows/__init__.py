"""Example workflows (templates beside this file) and their step handlers."""
