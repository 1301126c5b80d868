"""placeholder"""
def prune(*a, **k):
    raise NotImplementedError
