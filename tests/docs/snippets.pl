#!/usr/bin/perl
# docs_snippets: every fenced C snippet of README.md and docs/*.md is,
# verbatim, in a program that the build compiles (and CTest runs).
#
# usage: snippets.pl SOURCE_DIR
#
# Each ```c block MUST be preceded (on the line just before its fence) by
#   <!-- from: PATH -->
# naming the file it is taken from, relative to the repository root: a .c
# file under examples/ or docs/examples/ (the directories CMakeLists.txt
# builds programs from).  The block's lines, exactly as written (spaces
# included), must appear as consecutive lines of that file.  Prints one
# line per snippet and fails when one is missing or differs, or when the
# README has no snippet at all.
use strict;
use warnings;

my $root = shift or die "usage: snippets.pl SOURCE_DIR\n";
chdir $root or die "$root: $!\n";
my @docs = ('README.md', sort glob('docs/*.md'));
my ($ok, $bad, $readme) = (0, 0, 0);

sub slurp {
  my ($path) = @_;
  open(my $fh, '<', $path) or return undef;
  local $/;
  my $text = <$fh>;
  close $fh;
  return $text;
}

for my $md (@docs) {
  my $text = slurp($md);
  defined $text or die "$md: $!\n";
  my @lines = split /\n/, $text, -1;
  for (my $i = 0; $i < @lines; $i++) {
    next unless $lines[$i] =~ /^```c\s*$/;
    my $start = $i + 1;
    my @block;
    for ($i++; $i < @lines && $lines[$i] !~ /^```\s*$/; $i++) {
      push @block, $lines[$i];
    }
    my $where = "$md:$start";
    my $from = $start >= 2 ? $lines[$start - 2] : '';
    if ($from !~ /^<!-- from: (\S+) -->$/) {
      print "FAIL $where: no <!-- from: PATH --> line before the snippet\n";
      $bad++;
      next;
    }
    my $path = $1;
    if ($path !~ m{^(examples|docs/examples)/[\w./-]+\.c$} || $path =~ m{\.\.}) {
      print "FAIL $where: $path is not a compiled example (examples/ or docs/examples/)\n";
      $bad++;
      next;
    }
    my $src = slurp($path);
    if (!defined $src) {
      print "FAIL $where: $path: cannot read it\n";
      $bad++;
      next;
    }
    my $want = join("\n", @block) . "\n";
    if (index("\n" . $src, "\n" . $want) < 0) {
      print "FAIL $where: the snippet is not in $path verbatim; it begins\n";
      print "  $block[0]\n" if @block;
      $bad++;
      next;
    }
    print "ok   $where: " . scalar(@block) . " lines from $path\n";
    $ok++;
    $readme++ if $md eq 'README.md';
  }
}
if ($readme == 0) {
  print "FAIL README.md: no C snippet (it quotes examples/quickstart/quickstart.c)\n";
  $bad++;
}
print "$ok snippets ok, $bad failed\n";
exit($bad ? 1 : 0);
