#!/usr/bin/awk -f
# heater.awk -- a room-heating simulator that speaks the bbzo oracle protocol, version 1, text format.
#
#   examples/custom_simulator/heater.sh      (starts awk on this file; bbzo runs it, see docs/custom_simulators.md)
#
# One input row  = two heater settings u1, u2 (clipped to [0, 1]) for two 4-hour phases.
# One output row = the room temperature [deg C] at the end of phase 1 and of phase 2.
# Physics: Newton cooling to the outside air plus the heater, explicit Euler steps of 3 minutes, and a
# safety thermostat that cuts the heater whenever the room is at or above 26 deg C (not differentiable).
BEGIN {
    T0 = 12; TOUT = 5; K = 0.15; GAIN = 6; TMAX = 26; DT = 0.05; NSTEP = 80
    print "bbzo-oracle 1 2 2 text"          # handshake: protocol 1, d_in 2, d_out 2, text rows
    fflush()
    left = 0                                 # rows of the current query still to answer
}
left == 0 {                                  # expecting a request header
    if ($1 == "quit") exit 0
    if ($1 != "query" || NF != 3 || $3 != 2 || $2 !~ /^[0-9]+$/) {
        print "error heater.awk expected 'query <n> 2', got: " $0
        fflush()
        next
    }
    left = $2 + 0
    print "ok " left " 2"
    if (left == 0) fflush()
    next
}
{                                            # one input row
    if (NF != 2) print "nan nan"             # bbzo reports NaN rows as a simulator failure
    else {
        simulate($1 + 0, $2 + 0)
        printf "%.17g %.17g\n", t1, t2
    }
    if (--left == 0) fflush()                # the whole answer is out: flush it
}
function clip(u) { return u < 0 ? 0 : (u > 1 ? 1 : u) }
function simulate(u1, u2,    T, s, u, p) {   # sets the globals t1, t2
    T = T0
    for (s = 0; s < 2 * NSTEP; s++) {
        u = (s < NSTEP) ? clip(u1) : clip(u2)
        p = (T < TMAX) ? GAIN * u : 0
        T += DT * (p - K * (T - TOUT))
        if (s == NSTEP - 1) t1 = T
    }
    t2 = T
}
