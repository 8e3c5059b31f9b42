import sys
def main() -> int:
    print("compactor")
    return 0
