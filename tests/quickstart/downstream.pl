#!/usr/bin/perl
# The quickstart's downstream: a stock service on loopback.
# usage: downstream.pl LOG
# Listens on 127.0.0.1 (a free port, printed as "port N" on standard
# output), answers GET /stock/N with the body "N" after N milliseconds when
# N >= 100 (at once below), and appends one line per request to LOG:
# "got /stock/N grpc-timeout=<value or ->", when it reads the request, and
# "answered /stock/N" or "abandoned /stock/N" (the client closed before the
# answer was due).
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use IO::Handle;

my $log = shift or die "usage: downstream.pl LOG\n";
my $srv = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                Listen => 64, ReuseAddr => 1, Proto => 'tcp')
  or die "listen: $!\n";
$SIG{CHLD} = 'IGNORE';
$SIG{TERM} = sub { exit 0 };
STDOUT->autoflush(1);
print "port ", $srv->sockport, "\n";

sub note {
  open(my $fh, '>>', $log) or die "$log: $!\n";
  print $fh "@_\n";
  close $fh;
}

while (1) {
  my $c = $srv->accept or next;
  my $pid = fork;
  if (!defined $pid) { close $c; next; }
  if ($pid) { close $c; next; }
  close $srv;
  my ($line, %h) = (scalar <$c>);
  while (defined(my $l = <$c>)) {
    last if $l =~ /^\r?\n$/;
    $h{lc $1} = $2 if $l =~ /^([^:]+):\s*(.*?)\r?$/;
  }
  my ($path) = defined $line ? $line =~ m{^GET (\S+) } : ();
  if (!defined $path || $path !~ m{^/stock/(\d+)$}) {
    print $c "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    exit 0;
  }
  my $n = $1;
  note("got $path grpc-timeout=" . ($h{'grpc-timeout'} // '-'));
  # Wait the delay, or until the client closes (readable at end of file).
  my $delay = $n >= 100 ? $n / 1000 : 0;
  if ($delay > 0 && IO::Select->new($c)->can_read($delay)) {
    note("abandoned $path");
    exit 0;
  }
  print $c "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n",
           "Content-Length: ", length($n), "\r\nConnection: close\r\n\r\n$n";
  note("answered $path");
  exit 0;
}
