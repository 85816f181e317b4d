def parse_pbtxt(t): pass
def triton_config(*a): pass
def write_triton_repository(*a): pass
