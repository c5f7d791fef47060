import sys,re
# RSS of a process by kind of mapping from /proc/PID/smaps copies: main_heap ([heap], glibc main
# arena), arena_heaps (glibc non-main arena heaps: anonymous, 64 MiB aligned), anon_other, shm,
# files. usage: python3 bench/smaps_by_mapping.py SMAPS...
def parse(p):
    maps=[];cur=None
    for l in open(p):
        m=re.match(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$',l)
        if m:
            cur=dict(s=int(m[1],16),e=int(m[2],16),perm=m[3],name=m[4].strip(),rss=0); maps.append(cur)
        elif l.startswith('Rss:'): cur['rss']=int(l.split()[1])
    return maps
def classify(maps):
    out={}
    HM=64<<20
    for m in maps:
        n=m['name']
        if n=='[heap]': k='main_heap'
        elif n=='' and m['s']%HM==0 and m['perm'].startswith('rw'): k='arena_heaps'
        elif n=='' : k='anon_other'
        elif n.startswith('/dev/shm') or 'SYSV' in n or n.startswith('/memfd'): k='shm'
        elif n.startswith('['): k=n
        else: k='files'
        out[k]=out.get(k,0)+m['rss']
    return out
for p in sys.argv[1:]:
    c=classify(parse(p)); print(p.split('/')[-2]+'/'+p.split('/')[-1], ' '.join(f'{k}={v/1024:.1f}' for k,v in sorted(c.items())), f'total={sum(c.values())/1024:.1f}MiB')
