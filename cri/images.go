package cri

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/distribution/reference"
	"google.golang.org/grpc"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/statefile"
)

// imagesVersion is bumped when the image list changes incompatibly.
const imagesVersion = 1

// ImageService is the CRI ImageService of slot mode: containers run no
// image, so a pull downloads nothing and only records the reference, which
// is what the kubelet needs to go on (ImageStatus finds it, the
// container's image_ref matches PullImage's). The list is persisted in
// <dir>/.images.json.
type ImageService struct {
	runtime.UnimplementedImageServiceServer
	dir     string
	path    string
	durable bool

	mu     sync.RWMutex
	images map[string]*imageRecord // by ID
}

// imageRecord is one recorded image.
type imageRecord struct {
	ID          string            `json:"id"`
	RepoTags    []string          `json:"repo_tags,omitempty"`
	RepoDigests []string          `json:"repo_digests,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	PulledAt    time.Time         `json:"pulled_at"`
}

type imagesFile struct {
	Version int            `json:"version"`
	Images  []*imageRecord `json:"images"`
}

// NewImageService loads the image list of dir. A list that cannot be read
// is moved aside (and reported) rather than stopping the daemon: it holds
// nothing a pull cannot record again.
func NewImageService(ctx context.Context, dir string, durable bool) (*ImageService, error) {
	s := &ImageService{dir: dir, path: filepath.Join(dir, ImagesFile), durable: durable, images: map[string]*imageRecord{}}
	var f imagesFile
	err := statefile.ReadJSON(s.path, &f)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return s, nil
	case err == nil && f.Version != imagesVersion:
		err = fmt.Errorf("image list version %d, want %d", f.Version, imagesVersion)
	}
	if err != nil {
		aside := fmt.Sprintf("%s.damaged-%d", s.path, time.Now().UnixNano())
		if rerr := os.Rename(s.path, aside); rerr != nil {
			return nil, fmt.Errorf("image list %s is unreadable (%v) and cannot be moved aside: %w", s.path, err, rerr)
		}
		log.G(ctx).WithError(err).WithField("moved_to", aside).Warn("image list unreadable; starting with none")
		return s, nil
	}
	for _, img := range f.Images {
		if img != nil && img.ID != "" {
			s.images[img.ID] = img
		}
	}
	return s, nil
}

// save writes the list; the caller holds mu.
func (s *ImageService) save() error {
	f := imagesFile{Version: imagesVersion, Images: make([]*imageRecord, 0, len(s.images))}
	for _, img := range s.images {
		f.Images = append(f.Images, img)
	}
	sort.Slice(f.Images, func(i, j int) bool { return f.Images[i].ID < f.Images[j].ID })
	data, err := statefile.EncodeJSON(f)
	if err != nil {
		return err
	}
	if err := statefile.WriteFiles(s.dir, s.durable, statefile.File{Name: ImagesFile, Data: data}); err != nil {
		return fmt.Errorf("save image list: %w", err)
	}
	return nil
}

// parsedRef is a normalized image reference.
type parsedRef struct {
	named  reference.Named
	id     string // "sha256:" + the SHA-256 of the normalized reference
	tag    string // "docker.io/library/busybox:latest", or ""
	digest string // "docker.io/library/busybox@sha256:…", or ""
}

// parseRef normalizes a reference as docker and containerd do ("busybox"
// is docker.io/library/busybox:latest).
func parseRef(ref string) (parsedRef, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return parsedRef{}, fmt.Errorf("%w: image reference %q: %v", errdefs.ErrInvalidArgument, ref, err)
	}
	named = reference.TagNameOnly(named)
	sum := sha256.Sum256([]byte(named.String()))
	p := parsedRef{named: named, id: "sha256:" + hex.EncodeToString(sum[:])}
	if t, ok := named.(reference.NamedTagged); ok {
		if tagged, err := reference.WithTag(reference.TrimNamed(named), t.Tag()); err == nil {
			p.tag = tagged.String()
		}
	}
	if d, ok := named.(reference.Digested); ok {
		if canonical, err := reference.WithDigest(reference.TrimNamed(named), d.Digest()); err == nil {
			p.digest = canonical.String()
		}
	}
	return p, nil
}

func isHex(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return s != ""
}

// lookup finds an image by ID ("sha256:…"), unique ID prefix (hex), tag or
// digest reference; nil when there is none. The caller holds mu.
func (s *ImageService) lookup(ref string) *imageRecord {
	if ref == "" {
		return nil
	}
	if img, ok := s.images[ref]; ok {
		return img
	}
	if hexPart := strings.TrimPrefix(ref, "sha256:"); isHex(hexPart) {
		var found *imageRecord
		for id, img := range s.images {
			if strings.HasPrefix(strings.TrimPrefix(id, "sha256:"), hexPart) {
				if found != nil {
					return nil // ambiguous
				}
				found = img
			}
		}
		if found != nil || hexPart != ref {
			return found
		}
		// Not an ID: a name made of hex digits ("cafe").
	}
	p, err := parseRef(ref)
	if err != nil {
		return nil
	}
	for _, img := range s.images {
		if p.digest != "" && slices.Contains(img.RepoDigests, p.digest) {
			return img
		}
		if p.digest == "" && p.tag != "" && slices.Contains(img.RepoTags, p.tag) {
			return img
		}
	}
	return nil
}

// toCRI renders an image. Its size is that of its record: nothing else
// of it is stored, and the CRI wants a size above 0 (crictl rmi refuses
// an image without one).
func (img *imageRecord) toCRI() *runtime.Image {
	size := 1
	if data, err := json.Marshal(img); err == nil {
		size = len(data)
	}
	return &runtime.Image{
		Id:          img.ID,
		RepoTags:    img.RepoTags,
		RepoDigests: img.RepoDigests,
		Size:        uint64(size),
		Spec:        &runtime.ImageSpec{Image: img.ID, Annotations: img.Annotations},
	}
}

// imageOfContainer is what a container records of its image.
type imageOfContainer struct {
	display string // the image as ContainerStatus shows it
	id      string // image ID, as PullImage returned it
	ref     string // digested reference, else the ID
}

// forContainer resolves a container's image. It need not have been
// pulled: a container runs no image, and an unknown reference gets the ID
// a pull would record.
func (s *ImageService) forContainer(spec *runtime.ImageSpec) imageOfContainer {
	ref := spec.GetImage()
	s.mu.RLock()
	img := s.lookup(ref)
	s.mu.RUnlock()
	if img != nil {
		out := imageOfContainer{display: ref, id: img.ID, ref: img.ID}
		switch {
		case len(img.RepoTags) > 0:
			out.display = img.RepoTags[0]
		case len(img.RepoDigests) > 0:
			out.display = img.RepoDigests[0]
		}
		if len(img.RepoDigests) > 0 {
			out.ref = img.RepoDigests[0]
		}
		return out
	}
	out := imageOfContainer{display: ref}
	if p, err := parseRef(ref); err == nil {
		out.id, out.ref = p.id, p.id
		if p.digest != "" {
			out.ref = p.digest
		}
	} else if strings.HasPrefix(ref, "sha256:") {
		out.id, out.ref = ref, ref
	}
	return out
}

// PullImage records an image; nothing is downloaded. The image ID is
// derived from the normalized reference, so pulling it again is the same
// image, and a tag moves to the image pulled last.
func (s *ImageService) PullImage(ctx context.Context, req *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	ref := req.GetImage().GetImage()
	p, err := parseRef(ref)
	if err != nil {
		return nil, toGRPC(ctx, "PullImage", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Records are replaced, never changed in place: readers hold them.
	img := &imageRecord{ID: p.id}
	old, ok := s.images[p.id]
	if ok {
		cp := *old
		cp.RepoTags, cp.RepoDigests = slices.Clone(old.RepoTags), slices.Clone(old.RepoDigests)
		img = &cp
	}
	changed := !ok
	if p.tag != "" && !slices.Contains(img.RepoTags, p.tag) {
		img.RepoTags = append(img.RepoTags, p.tag)
		changed = true
	}
	if p.digest != "" && !slices.Contains(img.RepoDigests, p.digest) {
		img.RepoDigests = append(img.RepoDigests, p.digest)
		changed = true
	}
	if !changed {
		return &runtime.PullImageResponse{ImageRef: img.ID}, nil
	}
	img.PulledAt = time.Now().UTC()
	if a := req.GetImage().GetAnnotations(); len(a) > 0 {
		img.Annotations = a
	}
	prev := maps.Clone(s.images) // restored if the write fails
	for id, other := range s.images {
		if id == img.ID || p.tag == "" || !slices.Contains(other.RepoTags, p.tag) {
			continue
		}
		moved := *other
		moved.RepoTags = slices.DeleteFunc(slices.Clone(other.RepoTags), func(t string) bool { return t == p.tag })
		if len(moved.RepoTags) == 0 && len(moved.RepoDigests) == 0 {
			delete(s.images, id)
		} else {
			s.images[id] = &moved
		}
	}
	s.images[img.ID] = img
	if err := s.save(); err != nil {
		s.images = prev
		return nil, toGRPC(ctx, "PullImage", err)
	}
	log.G(ctx).WithFields(log.Fields{"image": p.named.String(), "id": img.ID}).Info("image recorded (slot mode: nothing downloaded)")
	return &runtime.PullImageResponse{ImageRef: img.ID}, nil
}

func (s *ImageService) listImages(f *runtime.ImageFilter) []*runtime.Image {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if ref := f.GetImage().GetImage(); ref != "" {
		if img := s.lookup(ref); img != nil {
			return []*runtime.Image{img.toCRI()}
		}
		return nil
	}
	out := make([]*runtime.Image, 0, len(s.images))
	for _, img := range s.images {
		out = append(out, img.toCRI())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Id < out[j].Id })
	return out
}

// ListImages lists the recorded images, or the one the filter names.
func (s *ImageService) ListImages(_ context.Context, req *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return &runtime.ListImagesResponse{Images: s.listImages(req.GetFilter())}, nil
}

func (s *ImageService) StreamImages(req *runtime.StreamImagesRequest, stream grpc.ServerStreamingServer[runtime.StreamImagesResponse]) error {
	return sendChunks(s.listImages(req.GetFilter()), func(items []*runtime.Image) error {
		return stream.Send(&runtime.StreamImagesResponse{Images: items})
	})
}

// ImageStatus reports an image; an unknown one is an empty response, as
// the CRI asks.
func (s *ImageService) ImageStatus(ctx context.Context, req *runtime.ImageStatusRequest) (*runtime.ImageStatusResponse, error) {
	s.mu.RLock()
	img := s.lookup(req.GetImage().GetImage())
	var cp imageRecord
	if img != nil {
		cp = *img
	}
	s.mu.RUnlock()
	if img == nil {
		return &runtime.ImageStatusResponse{}, nil
	}
	resp := &runtime.ImageStatusResponse{Image: cp.toCRI()}
	if req.GetVerbose() {
		data, err := json.Marshal(struct {
			*imageRecord
			Note string `json:"note"`
		}{&cp, "slot mode records images; nothing was downloaded"})
		if err != nil {
			return nil, toGRPC(ctx, "ImageStatus", err)
		}
		resp.Info = map[string]string{"info": string(data)}
	}
	return resp, nil
}

// RemoveImage removes an image with all its tags; removing an unknown
// image succeeds (CRI).
func (s *ImageService) RemoveImage(ctx context.Context, req *runtime.RemoveImageRequest) (*runtime.RemoveImageResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	img := s.lookup(req.GetImage().GetImage())
	if img == nil {
		return &runtime.RemoveImageResponse{}, nil
	}
	delete(s.images, img.ID)
	if err := s.save(); err != nil {
		s.images[img.ID] = img
		return nil, toGRPC(ctx, "RemoveImage", err)
	}
	return &runtime.RemoveImageResponse{}, nil
}

// ImageFsInfo reports the usage of the state directory's filesystem,
// where the image list (and everything else of the sandboxer) lives.
func (s *ImageService) ImageFsInfo(ctx context.Context, _ *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.dir, &st); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("statfs %s: %w", s.dir, err))
	}
	fs := &runtime.FilesystemUsage{
		Timestamp:  time.Now().UnixNano(),
		FsId:       &runtime.FilesystemIdentifier{Mountpoint: s.dir},
		UsedBytes:  &runtime.UInt64Value{Value: (st.Blocks - st.Bfree) * uint64(st.Bsize)},
		InodesUsed: &runtime.UInt64Value{Value: st.Files - st.Ffree},
	}
	return &runtime.ImageFsInfoResponse{ImageFilesystems: []*runtime.FilesystemUsage{fs}, ContainerFilesystems: []*runtime.FilesystemUsage{fs}}, nil
}
