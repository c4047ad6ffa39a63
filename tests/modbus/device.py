"""Simulated Modbus RTU devices for tests/modbus.rs and the HIL suite.

pymodbus (pinned in tests/interop/requirements.txt) serves units over RTU framing on a TCP port
on 127.0.0.1; the test joins that port to the tty the relay opens. Each unit has 200 holding
registers, input registers, coils and discrete inputs from address 0 (wire addressing).

Control is by lines on stdin, each answered by one line on stdout starting with "ok" or "error":
  set UNIT KIND ADDRESS VALUE...   kind: holding, input, coil, discrete
  get UNIT KIND ADDRESS COUNT      -> ok VALUE...
  reads UNIT                       -> ok N (read requests the unit has answered)
  mute UNIT on|off                 the unit stops (starts again) answering
  corrupt N                        the next N replies have a wrong CRC
  garbage N                        the next N replies come after 5 bytes of noise
  quit
"""

import argparse
import asyncio
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer

FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
NOISE = bytes([0x00, 0xFF, 0x55, 0xAA, 0x13])


class Unit(ModbusSlaveContext):
    """A unit's data tables; counts the reads it answers."""

    def __init__(self):
        # The context adds 1 to every wire address, so the blocks start at 1.
        super().__init__(
            di=ModbusSequentialDataBlock(1, [0] * 200),
            co=ModbusSequentialDataBlock(1, [0] * 200),
            hr=ModbusSequentialDataBlock(1, [0] * 200),
            ir=ModbusSequentialDataBlock(1, [0] * 200),
        )
        self.reads = 0

    def getValues(self, fc_as_hex, address, count=1):
        if address + count > 200:
            return 2  # the exception "illegal data address"
        if fc_as_hex in (1, 2, 3, 4):
            self.reads += 1
        return super().getValues(fc_as_hex, address, count)


class Faults:
    def __init__(self):
        self.muted = set()
        self.corrupt = 0
        self.garbage = 0

    def on_packet(self, sending, data):
        if not sending or not data:
            return data
        if data[0] in self.muted:
            return b""
        if self.corrupt > 0:
            self.corrupt -= 1
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if self.garbage > 0:
            self.garbage -= 1
            data = NOISE + data
        return data


def handle(line, units, faults):
    words = line.split()
    if not words:
        return "error empty line"
    cmd, args = words[0], words[1:]
    if cmd == "set":
        unit, kind, address = units[int(args[0])], FUNCTION[args[1]], int(args[2])
        unit.setValues(kind, address, [int(v) for v in args[3:]])
        return "ok"
    if cmd == "get":
        unit, kind = units[int(args[0])], FUNCTION[args[1]]
        values = unit.store[unit.decode(kind)].getValues(int(args[2]) + 1, int(args[3]))
        return "ok " + " ".join(str(int(v)) for v in values)
    if cmd == "reads":
        return f"ok {units[int(args[0])].reads}"
    if cmd == "mute":
        unit = int(args[0])
        if args[1] == "on":
            faults.muted.add(unit)
        else:
            faults.muted.discard(unit)
        return "ok"
    if cmd == "corrupt":
        faults.corrupt = int(args[0])
        return "ok"
    if cmd == "garbage":
        faults.garbage = int(args[0])
        return "ok"
    return f"error unknown command {cmd!r}"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--units", default="1")
    args = parser.parse_args()
    units = {int(u): Unit() for u in args.units.split(",")}
    faults = Faults()
    context = ModbusServerContext(slaves=units, single=False)
    server = ModbusTcpServer(
        context,
        framer=FramerType.RTU,
        address=("127.0.0.1", args.port),
        trace_packet=faults.on_packet,
    )
    await server.serve_forever(background=True)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
        try:
            reply = handle(line, units, faults)
        except (KeyError, IndexError, ValueError) as error:
            reply = f"error {error!r}"
        print(reply, flush=True)
    await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
