# Draws the scale-out storms side by side (make bench-fleet): requests
# offered to and served by the Chef server per second, and instances
# registered and converged, over the storm's time. Given with -e:
# out (the PNG), shipped and off (the two storms' data files: seconds,
# offered, served, registered, converged), n (the fleet's size), rate
# (what the proxy lets through a second), xmax (the longer storm's
# seconds: both are drawn on the same time axis), ymax (above the higher
# offered rate: both request plots share their scale).
set terminal pngcairo size 1400,800 font "sans,11"
set output out
set multiplot layout 2,2 title sprintf("%d agents at once, a Chef server taking %g requests/s", n, rate)
set grid
set xrange [0:xmax]
set key top right
set xlabel "seconds from the launch"
set ylabel "requests per second"
set yrange [0:ymax]
set title "as shipped: requests"
plot shipped using 1:2 with steps lw 2 title "offered", \
     shipped using 1:3 with steps lw 2 title "served", \
     rate with lines dt 2 lc "gray" title "the server's rate"
set title "backoff and splay off: requests"
plot off using 1:2 with steps lw 2 title "offered", \
     off using 1:3 with steps lw 2 title "served", \
     rate with lines dt 2 lc "gray" title "the server's rate"
set ylabel "instances"
set yrange [0:n*1.05]
set key bottom right
set title "as shipped: instances"
plot shipped using 1:4 with steps lw 2 title "registered", \
     shipped using 1:5 with steps lw 2 title "converged"
set title "backoff and splay off: instances"
plot off using 1:4 with steps lw 2 title "registered", \
     off using 1:5 with steps lw 2 title "converged"
unset multiplot
